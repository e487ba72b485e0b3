from backupd.cli import main

main()
