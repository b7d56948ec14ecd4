"""Errors of make_shards that are the user's to fix (a path, a layout, missing labels)."""


class ShardingError(Exception):
    """Raised for a mistake in what was asked; the message is one line for the user.

    The click layer turns it into `alexnet_fast.tools.cli.UserError` (one line on stderr, exit 2).
    """


class RejectedImage(Exception):
    """An input file that cannot become a sample; the message is the reason written to `rejected`."""
