"""Storage layer: locations (local, memory://, s3://), derivatives layout, region writes."""

from gmfx.storage._layout import default_output, store_location, write_dataset_description
from gmfx.storage._location import Location, LocationLike, as_location, join_url, parse_key_values, parse_storage_options, redact
from gmfx.storage._regions import RegionStore, open_dataset, open_store, plan_token

__all__ = [
    "Location",
    "LocationLike",
    "RegionStore",
    "as_location",
    "default_output",
    "join_url",
    "open_dataset",
    "open_store",
    "parse_key_values",
    "parse_storage_options",
    "plan_token",
    "redact",
    "store_location",
    "write_dataset_description",
]
