"""The runs wing: a run folder's layout and crash-safe writing (`folder`), the checkpoint manager and the formats'
interface (`checkpoints`) with the built-in formats (`one_file`, `sharded`), its lock (`lock`), reading a
checkpoint's weights (`weights`), loading a run's config, model, tokenizer and sampling settings (`loading`),
exporting (`export`, `diffusers_export`), and the torch-free names a checkpoint is taken by (`names`)."""
