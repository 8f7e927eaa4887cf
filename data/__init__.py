"""The datasets, one folder each (data/<dataset>/prepare.py writes its train.bin and val.bin), and
the code that reads them: data.dataset (file paths and batches) and data.tokenizer (tokenizers).

DATA_DIR is this folder. The readers look it up when called, so a test can point it elsewhere.
"""

import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
