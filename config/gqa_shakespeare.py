# The main job (config/rope_shakespeare.py) with grouped-query attention: one key/value head shared by
# the four query heads (multi-query attention), so the KV cache is a quarter the size.
import os

exec(open(os.path.join(os.path.dirname(__file__), "rope_shakespeare.py")).read())
n_kv_head = 1
out_dir = "out/gqa_shakespeare"
