# The main job: RoPE on character-level Tiny Shakespeare, sized for a 2-core CPU.
# Budget: 4x the training time of nanoGPT's 2,000-step CPU recipe, measured beside it (bench.py nanogpt).
# nanoGPT's CPU recipe model (4 layers, 4 heads, 128 wide, block 64) with batch 16: at this size float32
# beats bf16 and a wider model learns less per second (BENCHMARKS.md, Levers measured). ReLU^2 and an untied
# head each reach a lower val loss in the budget than GELU and a tied one (BENCHMARKS.md, the recipe's sweep).

out_dir = "out/rope_shakespeare"
dataset = "shakespeare_char"
pos_encoding = "rope"

eval_interval = 500
eval_iters = 100  # the best val loss is estimated on 100 val batches
log_interval = 100
always_save_checkpoint = False  # ckpt.pt keeps the best val loss

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
activation = "relu2"
tie_embeddings = False
# nanoGPT's recipe has batch 12 and lr 1e-3. A step of 16 costs little more than one of 12 for a
# third more tokens (24 and 32 add no throughput); at this batch AdamW alone reaches nanoGPT's CPU val
# loss soonest at lr 2e-3 with a short warmup (BENCHMARKS.md has both sweeps), the lr Muon keeps.
batch_size = 16
dropout = 0.0

# Muon on the blocks' matrices, AdamW on the rest: Muon reaches a val loss in fewer steps, enough to pay for
# its Newton-Schulz iteration at equal training time (BENCHMARKS.md, three seeds).
optimizer = "muon"
learning_rate = 4e-3  # AdamW's, on the embeddings and the head (beside Muon, 4e-3 beats 2e-3)
muon_lr_scale = 0.5  # Muon at 2e-3
max_iters = 4000  # sized to the budget on 2 cores
lr_decay_iters = 4000
lr_schedule = "linear"
min_lr = 0.0
warmup_iters = 50
beta2 = 0.99

device = "auto"  # the CPU on a machine without a GPU
dtype = "auto"  # float32 on the CPU at this width (bf16 pays from n_embd 256 on)
compile = False  # compiling costs more than it saves at this size on the CPU
