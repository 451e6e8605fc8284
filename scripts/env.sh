# Offline, quiet defaults for running axolotl here (sourced by the scripts).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled TRL_EXPERIMENTAL_SILENCE=1
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
export PATH="$(pwd)/.venv/bin:$PATH"  # axolotl launches `accelerate` from PATH
