"""Facts about the hand datasets, in one place: aspects, 11k's columns, the protocol's thresholds.

11k Hands: `HandInfo.csv` columns and the four aspects; identities with id <= the aspect's
threshold train, the rest test (MBA-Net / CLIP-HandID protocol). HD: subjects <= 447 train,
448-501 test, 502-712 are gallery distractors.
"""

from __future__ import annotations

ASPECTS = ("dorsal right", "dorsal left", "palmar right", "palmar left")
HANDINFO_COLUMNS = (
    "id", "age", "gender", "skinColor", "accessories", "nailPolish",
    "aspectOfHand", "imageName", "irregularities",
)  # fmt: skip
THRESHOLDS_11K = {"dorsal right": 1050, "dorsal left": 1037, "palmar right": 1051, "palmar left": 1042}
HD_FOLDERS = ("1-501", "502-712")
HD_TRAIN_MAX = 447
