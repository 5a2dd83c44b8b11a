"""Storage layer: locations (local, memory://, s3://), derivatives layout, region writes."""

from gmfx.storage._layout import STORE_SUFFIXES, default_output, store_location, write_dataset_description
from gmfx.storage._location import Location, join_url, parse_key_values, parse_storage_options, redact
from gmfx.storage._regions import RegionStore, open_dataset, plan_token

__all__ = [
    "Location",
    "RegionStore",
    "STORE_SUFFIXES",
    "default_output",
    "join_url",
    "open_dataset",
    "parse_key_values",
    "parse_storage_options",
    "plan_token",
    "redact",
    "store_location",
    "write_dataset_description",
]
