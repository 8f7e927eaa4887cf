# The main job (config/rope_shakespeare.py) with Gemma 3's layout: three sliding-window layers of 16
# tokens to one global layer (Gemma 3 has five to one; this model has four layers), each kind with its own
# RoPE base, given as Hugging Face's per-layer-type rope_parameters.
import os

exec(open(os.path.join(os.path.dirname(__file__), "rope_shakespeare.py")).read())
layer_types = "sliding_attention,sliding_attention,sliding_attention,full_attention"
sliding_window = 16
rope_scaling = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
}
out_dir = "out/local_global_shakespeare"
