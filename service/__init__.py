"""vaeserve's HTTP service. Importing this package builds nothing: see `service.app.create_app`."""

import warnings

# Far from a model's data, float32 arithmetic overflows to inf (and inf - inf to NaN); the service
# expects that and answers it explicitly (a 422 naming the row, or the most anomalous score), so numpy's
# RuntimeWarning about it is noise. Filtered once here for the service's own modules: np.errstate around
# each operation cost ~2 us per use on the single-row path.
warnings.filterwarnings("ignore", r"(overflow|invalid value) encountered", RuntimeWarning, r"service\.")
