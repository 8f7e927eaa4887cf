# RoPE on character-level Shakespeare at nanoGPT's GPU scale (its config/train_shakespeare_char.py):
# 6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2; bf16 autocast on CUDA.
# nanoGPT's README reports this recipe's val loss and time (learned positions, one A100): the reference for a
# GPU run of this config.

out_dir = "out/rope_shakespeare_gpu"
dataset = "shakespeare_char"
pos_encoding = "rope"

eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
batch_size = 64
dropout = 0.2

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99

device = "auto"
dtype = "auto"
compile = True
