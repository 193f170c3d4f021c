"""PMP, a defense: private-mask pretraining, a secret-safe release (the mask stays private, committed to
in the manifest), authorized fine-tuning with the mask, and the mask-recovery attacks on a release."""
from .mask import chance_iou, commitment, load_mask, mask_iou, save_mask, topk_mask
from .release import check_release, load_private, manifest_problems, mask_for_release, verify
from .train import EarlyBirdHook, MaskHook, PMPConfig, pooled_parameters, pretrain_pmp
from .upload import write_upload_folder

__all__ = ["chance_iou", "commitment", "load_mask", "mask_iou", "save_mask", "topk_mask", "check_release",
           "load_private", "manifest_problems", "mask_for_release", "verify", "EarlyBirdHook", "MaskHook", "PMPConfig",
           "pooled_parameters", "pretrain_pmp", "write_upload_folder"]
