from modelshield.cli.main import main

main()
