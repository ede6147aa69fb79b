"""Host-only side of microtun (CPython): PoP, gateway, provisioner, CLI.
The portable package (lib/microtun) never imports this one."""
