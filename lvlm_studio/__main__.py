from lvlm_studio.cli import main

main()
