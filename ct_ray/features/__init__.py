"""Feature dashboards of a CLT: `ct-ray features` computes them on Ray into the `features` table."""

from .job import FeaturesSpec, features_id, load_features_spec, parse_features_spec, run_features

__all__ = ["FeaturesSpec", "features_id", "load_features_spec", "parse_features_spec", "run_features"]
