"""The re-run engine: hook names, the one raw-torch module, the readout, KV re-runs."""
