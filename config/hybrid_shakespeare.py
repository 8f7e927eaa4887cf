# The main job (config/rope_shakespeare.py) as a RoPE/NoPE hybrid: every 4th layer has no positional
# encoding and attends to the whole context, the others rotate and attend within chunks of 16 tokens:
# Llama 4's iRoPE (its NoPE layers also scale their queries at long positions, attn_temperature_tuning).
import os

exec(open(os.path.join(os.path.dirname(__file__), "rope_shakespeare.py")).read())
pos_encoding = "rope,rope,rope,none"
layer_types = "chunked_attention,chunked_attention,chunked_attention,full_attention"
attention_chunk_size = 16
attn_temperature_tuning = True
floor_scale = 64  # Llama 4's 8,192 scaled to this context: the scale grows at 64, 128, ... tokens
out_dir = "out/hybrid_shakespeare"
