from ldm_jax.cli import main

main()
