"""The runs wing: a run folder's layout and crash-safe checkpoints (`folder`), its lock (`lock`), reading a checkpoint's
weights (`weights`), loading any run, export or official file as a model (`loading`), exporting (`export`,
`diffusers_export`), and the torch-free names a checkpoint is taken by (`names`)."""
