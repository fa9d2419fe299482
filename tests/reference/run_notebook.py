"""Executes a notebook headless (nbclient, the venv's python3 kernel) and writes the executed copy.

    python tests/reference/run_notebook.py NOTEBOOK.ipynb OUT.ipynb
The notebook reads its inputs from the environment (e.g. LLMLAB_EXPERIMENT_DIR).
"""
import os
import sys

import nbclient
import nbformat


def main():
    src, out = sys.argv[1], sys.argv[2]
    nb = nbformat.read(src, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(os.path.abspath(src))}})
    client.execute()
    nbformat.write(nb, out)
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                sys.stdout.write(o.get("text", ""))


if __name__ == "__main__":
    main()
