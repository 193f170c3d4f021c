"""Training, on data and models: the one training loop (hooks, checkpoints, cost probe), pretraining and
fine-tuning; the defenses pretrain with it, the attacks fine-tune with it."""
from .loop import Hook, LambdaHook, TrainConfig, Trainer, evaluate_loss

__all__ = ["Hook", "LambdaHook", "TrainConfig", "Trainer", "evaluate_loss"]
