"""The code interpreter that runs inside sandboxes: an HTTP server on port 49999 in front of real Jupyter
kernels (jupyter_client driving ipykernel, bash_kernel, Deno, IRkernel and JJava), speaking what
`e2b-code-interpreter` expects.

Like envd it imports nothing from the host side and runs from its own library directory, so the user's
Python environment (where the kernels live) and the server's dependencies never mix.
"""

DEFAULT_PORT = 49999
