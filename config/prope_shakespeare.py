# The main job (config/rope_shakespeare.py) with p-RoPE (Barbero et al. 2024): the highest quarter of
# each head's RoPE frequencies turn, the rest never do (Hugging Face's rope_type "proportional").
import os

exec(open(os.path.join(os.path.dirname(__file__), "rope_shakespeare.py")).read())
rope_scaling = {"rope_type": "proportional", "partial_rotary_factor": 0.25}
out_dir = "out/prope_shakespeare"
