"""Graph engine: capture, canonical op view, patterns, rules, pass manager."""
