"""Names shared by the data pipeline."""

MIX_STRATEGIES = ("equal", "size", "temperature")
TASK_IDS_COLUMN = "task_ids"
IGNORE_INDEX = -100  # label value ignored by torch's cross-entropy (and HF models' losses)
