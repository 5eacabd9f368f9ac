"""The planner: a feed's ``_id``s in compact arrays, and from them and ``(seed, epoch)`` the
documents of every batch, with no database and nothing that grows with N but the ids.

- ``ids``: the sorted ``_id``s (12-byte rows, int64, or a list), built from the listing's
  raw replies;
- ``order``: an epoch's order as a keyed permutation computed per position;
- ``batches``: global batches, shards and start offsets;
- ``plans``: the full order (``Plan``) and the windowed order (``WindowPlan``);
- ``mixture``: a feed of several sources (``MixturePlan``), a plan of plans;
- ``cache``: plans on disk, checked against the server at start.

The same seed gives the same batches on every run and machine, so a restart at epoch e,
shards across hosts and resumes are exact without coordination.
"""

from .batches import WHOLE, BatchCut, Shard
from .ids import Ids, IdsBuilder, SplitsBuilder, sort_key
from .mixture import MixSource, MixturePlan, Weight
from .plans import BatchWindow, Plan, WindowPlan

__all__ = ["WHOLE", "BatchCut", "BatchWindow", "Ids", "IdsBuilder", "MixSource", "MixturePlan",
           "Plan", "Shard", "SplitsBuilder", "Weight", "WindowPlan", "sort_key"]
