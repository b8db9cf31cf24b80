"""A hospital's segmentation test, as sums that merge exactly across hospitals.

A study's predicted mask is its voxels with probability >= 0.5. Three figures come out of it:

- Dice (MONAI's ``compute_dice``), summed over the test studies that hold a lesion: a study
  without one has no Dice (any prediction scores 0 or 1 there), so those are left to the next figure;
- whether a study holds a lesion at all, scored as a binary classification with the study's largest
  voxel probability as its score: the confusion matrix and AUC say how often the model misses a
  lesion or marks one where there is none;
- the 95th-percentile Hausdorff distance (MONAI's ``compute_hausdorff_distance``), in voxels of the
  model's input grid, summed over the studies where both the model and the reference mark voxels.

Only these sums and counts leave the hospital, as for classification: never a mask or a score.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from shared_models.classification_metrics import BinarySummary, summarize

THRESHOLD = 0.5


def segmentation_summary(probabilities: np.ndarray, masks: np.ndarray, loss_sum: float) -> BinarySummary:
    """``probabilities`` and ``masks``: (n, 1, X, Y, Z) voxel probabilities and 0/1 reference masks."""
    from monai.metrics import compute_dice, compute_hausdorff_distance  # MONAI loads only to score masks

    probs = np.asarray(probabilities, dtype=np.float32)
    reference = np.asarray(masks) > 0
    has_lesion = torch.as_tensor(reference.reshape(len(reference), -1).any(axis=1))
    study_scores = probs.reshape(len(probs), -1).max(axis=1) if len(probs) else np.zeros(0)
    summary = summarize(study_scores, has_lesion.numpy().astype(int), loss_sum, THRESHOLD)
    predicted = probs >= THRESHOLD
    marked = torch.as_tensor(predicted.reshape(len(predicted), -1).any(axis=1))
    pred_t, ref_t = torch.as_tensor(predicted, dtype=torch.float32), torch.as_tensor(reference, dtype=torch.float32)
    if has_lesion.any():
        dice = compute_dice(pred_t[has_lesion], ref_t[has_lesion], include_background=True, ignore_empty=False)
        summary.dice_sum, summary.dice_n = float(dice.sum()), int(has_lesion.sum())
    both = has_lesion & marked
    if both.any():
        with warnings.catch_warnings():  # MONAI 1.6 warns of its own internal call's argument, every time
            warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
            hd95 = compute_hausdorff_distance(pred_t[both], ref_t[both], include_background=True, percentile=95)
        summary.hd95_sum, summary.hd95_n = float(hd95.sum()), int(both.sum())
    return summary
