# The main job (config/rope_shakespeare.py) with only the positional encoding changed.
import os

exec(open(os.path.join(os.path.dirname(__file__), "rope_shakespeare.py")).read())
pos_encoding = "learned"
out_dir = "out/learned_shakespeare"
