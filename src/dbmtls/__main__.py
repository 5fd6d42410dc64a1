from dbmtls.cli import main

main()
