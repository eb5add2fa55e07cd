# GPT-2 124M on nanoGPT's OpenWebText (run nanoGPT's data/openwebtext/prepare.py first,
# then point dataset= at that directory). One GPU:
#   python train_gpt2.py config/gpt2_124m.py --dataset=../nanoGPT/data/openwebtext
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train_gpt2.py config/gpt2_124m.py ...
# Other optimizers: --optimizer=adam_mini, or --optimizer=adalomo --gradient_accumulation_steps=1
# (a fused driver cannot accumulate: raise batch_size instead).
out_dir = "out-gpt2-124m"
dataset = "data/openwebtext"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 40  # ~0.5M tokens per step on one GPU, as nanoGPT
optimizer = "adamw"
learning_rate = 6e-4
min_lr = 6e-5
beta2 = 0.95
weight_decay = 0.1
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
amp = True  # fp32 parameters, bf16 autocast forward
compile = True
