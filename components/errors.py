"""User-facing errors: raised for bad input, caught by the stage runner and printed without a traceback."""


class FiresightError(Exception):
    """An error caused by input (data, params, files) that the user can fix; the message says what and where."""


class DataError(FiresightError):
    """Unusable input data (no images, a class with too few images, a bad listing)."""


class WeightsError(FiresightError):
    """A backbone's weights file is missing or does not fit the architecture."""


class CheckpointError(FiresightError):
    """A checkpoint is missing, unreadable, or lacks its `meta`."""
