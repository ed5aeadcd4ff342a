"""toolbox on a Ray cluster: serving replicas (`serve`), batch jobs (`batch`), the connection (`cluster`).

Ray is an optional extra (`pip install 'rinna-toolbox[ray]'`). Importing this package
imports neither Ray nor torch; each entry point imports Ray when it runs, and says how
to install it when it is missing. docs/scale.md is the guide.
"""
