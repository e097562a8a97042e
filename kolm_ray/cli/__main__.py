from kolm_ray.cli import main

main()
