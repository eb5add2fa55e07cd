# The default run, spelled out: a 0.84M-parameter byte-level GPT on Python's own docs,
# a few minutes on a 2-core CPU, nothing downloaded. Same as `python train_gpt2.py`.
dataset = "stdlib"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 12
max_iters = 1500
warmup_iters = 100
eval_interval = 250
device = "cpu"
