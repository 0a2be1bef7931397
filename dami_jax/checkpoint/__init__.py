"""Checkpoints on disk: Hugging Face safetensors in and out, Orbax conversion, streaming merge.

- `safetensors_io`: the file format (memory-mapped `SafetensorsFile`, `write_safetensors`,
  `encode_header` for writers that stream tensor data, `CheckpointError`);
- `hf`: HF names <-> our params (`leaf_table`), `load_hf` / `save_hf`, and what
  writers share: `TensorIndex` (which file holds a tensor), `check_no_extra_tensors`,
  `plan_shards` / `write_shard_index`, `staging_dir` / `atomic_replace_dir`;
- `store`: `dami convert` outputs (Orbax `save_params` / `restore_params`);
- `merge`: `dami merge`, Θ(λ) written tensor by tensor (`merge_checkpoints`);
- `tokenizer_files`: the tokenizer and generation files copied beside a checkpoint.

Nothing is imported here: each user imports the module it needs (store pulls in Orbax).
"""
