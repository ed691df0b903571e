"""Rules that recognise attention and cache patterns (installed as ``mka_compile.passes``)."""

if __name__ == "passes":  # the checkout's root is on sys.path: hand over to an installed `passes`, if any
    import importlib.util as _util
    import os as _os

    _guard = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels", "_checkout.py")
    _spec = _util.spec_from_file_location("_mka_checkout", _guard)
    _module = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.hand_over(__name__, __file__)
