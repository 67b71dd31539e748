from mlx_lora.commands.cli import main

main()
