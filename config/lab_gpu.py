# The length lab (python eval_length.py config/lab_gpu.py --lab=True) at a GPU budget: the text runs at
# block 256 with 6 layers × 384 wide (nanoGPT's shakespeare_char GPU model), the passkey runs at the same
# width, every run about 4x the CPU default's steps; extension fine-tunes at 4 × 256 = 1,024 tokens.
lab_text_args = (
    "--dataset=shakespeare_char --block_size=256 --batch_size=64 --n_layer=6 --n_head=6 --n_embd=384 --dropout=0.2"
)
lab_passkey_args = "config/passkey_rope.py --batch_size=64 --n_layer=6 --n_head=6 --n_embd=384"
lab_train_args = "--device=cuda --dtype=bfloat16"
lab_jobs = 1  # one GPU
lab_passkey_rows = ("learned", "sinusoidal", "rope", "alibi", "none", "hybrid", "local_global", "prope")  # every row
lab_text_iters = 5000
lab_passkey_iters = 5000
extend_iters = 500  # a tenth of the text runs' steps, as on the CPU
device = "cuda"
multipliers = (0.5, 1, 2, 4, 8, 16)  # past the CPU default's 8×
eval_tokens = 65536  # 16 × 256 = 4,096 tokens is the longest length: 16 windows of it
depths = (0.0, 0.25, 0.5, 0.75, 1.0)
lab_train_dir = "out/lab_gpu"
lab_out_dir = "results_gpu"
lab_report = "RESULTS_gpu.md"
