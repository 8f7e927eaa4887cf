# The main job (config/rope_shakespeare.py) with no positional encoding at all (NoPE), a control.
import os

exec(open(os.path.join(os.path.dirname(__file__), "rope_shakespeare.py")).read())
pos_encoding = "none"
out_dir = "out/nope_shakespeare"
