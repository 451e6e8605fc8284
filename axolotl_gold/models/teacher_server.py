"""``python -m axolotl_gold.models.teacher_server --model <teacher_model> [--port 8012]``:
the teacher server (see ``axolotl_gold.models.remote.server``)."""

from axolotl_gold.models.remote.server import main

if __name__ == "__main__":
    main()
