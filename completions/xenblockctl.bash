_xenblockctl_completion() {
    local IFS=$'\n'
    local response

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD _XENBLOCKCTL_COMPLETE=bash_complete $1)

    for completion in $response; do
        IFS=',' read type value <<< "$completion"

        if [[ $type == 'dir' ]]; then
            COMPREPLY+=($(compgen -d -- "$value"))
            compopt -o filenames 2>/dev/null
        elif [[ $type == 'file' ]]; then
            COMPREPLY+=($(compgen -f -- "$value"))
            compopt -o filenames 2>/dev/null
        elif [[ $type == 'plain' ]]; then
            COMPREPLY+=($value)
        fi
    done

    return 0
}

_xenblockctl_completion_setup() {
    complete -o nosort -F _xenblockctl_completion xenblockctl
}

_xenblockctl_completion_setup;
