"""Glue to training frameworks, each imported only on use (`import hatify` never pays for them).

- `hatify.integrations.avalanche`: `HATMultiTaskModule`, `HATPlugin`, the `HAT` strategy (extra `hatify[avalanche]`);
- `hatify.integrations.lightning`: `HATCallback` (extra `hatify[lightning]`);
- `hatify.integrations.transformers`: `HATTaskModel`, `HATTrainerCallback` for the HF `Trainer` (extra `hatify[hf]`).

Each one only translates the framework's events into `begin_task`, `mask_scale`, `regularization` and `end_task`.
"""
