# Passkey retrieval (data/passkey) at one length: a small RoPE model trained on examples of up to
# 128 characters, to be evaluated past that length with eval_length.py. 2,000 steps leave room
# past where retrieval appears (RESULTS.md has the measured runs). Another encoding:
#   python train.py config/passkey_rope.py --pos_encoding=alibi --out_dir=out/passkey_alibi
#   python eval_length.py --ckpt=out/passkey_rope/ckpt.pt,out/passkey_alibi/ckpt.pt
out_dir = "out/passkey_rope"
dataset = "passkey"
block_size = 128  # data/passkey/prepare.py's MAX_LENGTH: the longest training example
batch_size = 16
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos_encoding = "rope"

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
min_lr = 1e-4
eval_interval = 500
eval_iters = 20
log_interval = 10
