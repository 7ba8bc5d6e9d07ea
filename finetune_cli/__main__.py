from finetune_cli.cli import main

main()
