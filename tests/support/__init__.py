"""Test support: the real components the tests and the bench run modelfs against, each implemented once.

Imported as `tests.support.<module>` with the repository root on the path (pytest's `pythonpath` setting;
`python -m bench.run` and `python -m tests.soak` from the root): `mount` (a modelfs daemon), `router` and
`router_server` (the test router process and the server it runs), `sshfs` (a network filesystem that can hang),
`nginx` and `squid` (the shipped caching proxies, a plain file server, a forward proxy), `fleet` (herds of nodes
behind a proxy), `ggufmaker` (valid GGUF files), `models` (model files in the llmlb layout), `procs` (stopping
processes, ports, waiting, RSS and CPU). Nothing here imports the bench.
"""
