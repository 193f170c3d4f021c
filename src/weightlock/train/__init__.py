"""The one training loop and pretraining."""
from .loop import Hook, LambdaHook, TrainConfig, Trainer, evaluate_loss

__all__ = ["Hook", "LambdaHook", "TrainConfig", "Trainer", "evaluate_loss"]
