"""How ranks are arranged and started: dims, process groups, CPU workarounds."""
