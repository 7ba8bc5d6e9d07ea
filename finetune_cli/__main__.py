from finetune_cli.cli.main import main

main()
