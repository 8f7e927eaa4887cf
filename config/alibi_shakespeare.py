# The main job (config/rope_shakespeare.py) with only the positional encoding changed.
import os

exec(open(os.path.join(os.path.dirname(__file__), "rope_shakespeare.py")).read())
pos_encoding = "alibi"
out_dir = "out/alibi_shakespeare"
