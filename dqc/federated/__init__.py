"""The travelling model with quality control across machines, on Flower.

The server (a Flower ServerApp) holds the model state, the validation set and the QC
bookkeeping, and runs the very same loop and policy as the single-machine script
(`dqc.runs.run_quality_control`); only "train one step at center X" is a network round trip.
Each center's node (a Flower ClientApp) trains and verifies on its own images from the state
the server names (it caches the last states it saw, so a digest can stand for one); the server
adopts nothing a node sends before `replies` has checked it.

- `messages`: what travels, and nothing else (no image, no image path).
- `node`: a center's side: who it is, one training step on ids it holds.
- `server`: the roster of nodes, the remote step, the ServerApp.
- `replies`: the one check of everything a node sends back (docs/threat-model.md).
- `runconfig`: the server's run config, checked, and the run specs built from it.
- `inprocess`: the server and the nodes in one process, no Ray (tests, debugging).
- `simulate` / `loopback`: the two engines (`python -m dqc.federated simulate|deploy`).
"""
