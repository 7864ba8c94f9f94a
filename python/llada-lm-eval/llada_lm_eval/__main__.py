"""`python -m llada_lm_eval ARGS`: lm-eval's own command line with the model `llada` registered."""

import llada_lm_eval  # noqa: F401  (registers the model)


def main():
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
