from mtreg.cli.main import main

main()
