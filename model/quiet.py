"""Model loading without noise: transformers' progress bars ("Loading weights", GGUF's "Converting and
de-quantizing GGUF tensors...") and warnings are off while a model loads, unless the user asked for more
(`tandem -v`: the "tandem" logger shows INFO)."""
from __future__ import annotations

import contextlib
import functools
import logging
import threading

_lock = threading.RLock()  # loads that overlap (threads) share one silenced state, set and restored once


@contextlib.contextmanager
def quiet_loading(verbose: bool | None = None):
    """Silence transformers (bars, warnings below ERROR) inside the block; `verbose` None: `tandem -v` decides."""
    if verbose is None:
        verbose = logging.getLogger("tandem").isEnabledFor(logging.INFO)
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf  # its bar is plain tqdm, not transformers'
    except ImportError:
        gguf = None
    with _lock:
        bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        gguf_tqdm = getattr(gguf, "tqdm", None)
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if gguf_tqdm is not None:
            gguf.tqdm = functools.partial(gguf_tqdm, disable=True)
        try:
            yield
        finally:
            if gguf_tqdm is not None:
                gguf.tqdm = gguf_tqdm
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()
